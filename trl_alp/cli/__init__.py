"""The ``trl-alp`` command line: the dispatch and the commands' setup (`trl_alp.cli.main`) and the ``train`` command
(`trl_alp.cli.train`). The experiments it runs are in `trl_alp.experiments`; the trainer, config and math never import
this package."""
