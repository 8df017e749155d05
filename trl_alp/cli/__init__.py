"""The ``trl-alp`` command line (`main`) and what its commands need: demo, stress test, benchmark, plots, offline
data and models. The trainer, config and math never import this package."""
