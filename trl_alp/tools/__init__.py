"""Tools around the trainer: CLI, demo, benchmark, plots, offline data and models. The core never imports them."""
