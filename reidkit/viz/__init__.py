"""Figures for the notebooks (matplotlib), the same in JupyterLab and in headless runs.

Every figure function returns a ``matplotlib.figure.Figure``; widgets only re-render figures.
One module per topic: ``base`` (grids, statistics, curves), ``ranking`` (ranked lists, the
query browser). Each notebook's topic module is re-exported here, so ``viz.<name>`` works.
"""

from reidkit.viz.base import (GREEN, GREY, RED, cmc_figure, curves, dataset_stats_figure,  # noqa: F401
                              image_grid, tensor_grid)
from reidkit.viz.ranking import (match_summary, ranked_browser, ranked_comparison, ranked_list,  # noqa: F401
                                 ranked_query_figure)
from reidkit.viz.scoring import precision_recall_figure, rank_shift_figure  # noqa: F401
from reidkit.viz.data import (bag_figure, camera_grid, camera_map_figure, identity_browser,  # noqa: F401
                              identity_grid, junk_figure, pk_batch_figure)
from reidkit.viz.bags import (assignment_survey_figure, bag_graph, bag_inference_figure, dgl_graph_diagram,  # noqa: F401
                              kernel_contrast, kernel_matrix, kernel_sigma_figure, kernel_widget,
                              save_dgl_graph_diagram, weak_training_curves, weak_triplet_figure)
from reidkit.viz.clustering import (contingency_figure, cross_camera_figure, distance_histograms,  # noqa: F401
                                    eps_sweep_figure, eps_widget, neighbours_figure)
from reidkit.viz.memory import (hardest_members_figure, hhcl_loop_figure, memories_figure, memory_2d_figure,  # noqa: F401
                                memory_widget, probe_figure, temperature_figure)
from reidkit.viz.backbone import (baseline_figure, gem_figure, gem_share, gem_values, gem_widget,  # noqa: F401
                                  pair_distance_figure, pipeline_diagram, stride_maps_figure)
