"""The application layer: the ``crvae`` command line, the demo, the paper's sweep, evaluation
reports and figures. Built on the library (``crvae_ext``), which never imports it."""
