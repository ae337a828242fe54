"""Figures for the notebooks (matplotlib), the same in JupyterLab and in headless runs.

Every figure function returns a ``matplotlib.figure.Figure``; widgets only re-render figures.
One module per topic: ``base`` (grids, statistics, curves), ``ranking`` (ranked lists, the
query browser). Each notebook's topic module is re-exported here, so ``viz.<name>`` works.
"""

from reidkit.viz.backbone import (  # noqa: F401
                              baseline_figure,
                              gem_figure,
                              gem_share,
                              gem_values,
                              gem_widget,
                              pair_distance_figure,
                              pipeline_diagram,
                              stride_maps_figure,
)
from reidkit.viz.bags import (  # noqa: F401
                              assignment_survey_figure,
                              bag_graph,
                              bag_inference_figure,
                              dgl_graph_diagram,
                              kernel_contrast,
                              kernel_matrix,
                              kernel_sigma_figure,
                              kernel_widget,
                              save_dgl_graph_diagram,
                              weak_training_curves,
                              weak_triplet_figure,
)
from reidkit.viz.cameras import camera_bias_figure  # noqa: F401
from reidkit.viz.base import (  # noqa: F401
                              GREEN,
                              GREY,
                              RED,
                              cmc_figure,
                              curves,
                              dataset_stats_figure,
                              image_grid,
                              tensor_grid,
)
from reidkit.viz.clustering import (  # noqa: F401
                              contingency_figure,
                              cross_camera_figure,
                              distance_histograms,
                              eps_sweep_figure,
                              eps_widget,
                              neighbours_figure,
)
from reidkit.viz.data import (  # noqa: F401
                              bag_figure,
                              camera_grid,
                              camera_map_figure,
                              identity_browser,
                              identity_grid,
                              junk_figure,
                              pk_batch_figure,
)
from reidkit.viz.memory import (  # noqa: F401
                              hardest_members_figure,
                              hhcl_loop_figure,
                              memories_figure,
                              memory_2d_figure,
                              memory_widget,
                              probe_figure,
                              temperature_figure,
)
from reidkit.viz.ranking import (  # noqa: F401
                              match_summary,
                              ranked_browser,
                              ranked_comparison,
                              ranked_list,
                              ranked_query_figure,
)
from reidkit.viz.scoring import precision_recall_figure, rank_shift_figure  # noqa: F401
