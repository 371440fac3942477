"""Looking inside models and runs: activation outliers, weight distributions, accuracy against size.

The numbers come from :mod:`qbert.inspection.outliers` and :mod:`qbert.inspection.weights` (torch and
numpy only); :mod:`qbert.inspection.plots` draws them with matplotlib (the ``viz`` extra), imported only
when a figure is written.
"""
