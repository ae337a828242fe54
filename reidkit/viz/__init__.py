"""Figures for the notebooks (matplotlib), the same in JupyterLab and in headless runs.

Every figure function returns a ``matplotlib.figure.Figure``; widgets only re-render figures.
One module per topic: ``base`` (grids, statistics, curves), ``ranking`` (ranked lists, the
query browser). Each notebook's topic module is re-exported here, so ``viz.<name>`` works.
"""

from reidkit.viz.base import (GREEN, GREY, RED, cmc_figure, curves, dataset_stats_figure,  # noqa: F401
                              image_grid, tensor_grid)
from reidkit.viz.ranking import ranked_browser, ranked_list  # noqa: F401
