"""Plot helpers for the research notebooks (``notebooks/``), plus a tolerant benchmark-JSON loader.

One module per kind of picture; every public name is re-exported here (``from elastic_jax import
viz; viz.plot_head_modes(...)``):

* ``router``: head modes, kept fractions and sparsity per layer, router margins and token
  influence (notebooks 01, 02);
* ``masks``: block masks, heatmaps, kept fraction against length (notebook 03);
* ``performance``: latency, speed-up, TFLOP/s, bandwidth and timeline plots (notebooks 01, 04);
* ``results``: reading ``benchmarks/results/*.json`` into tables, series maps and Markdown
  (notebook 04);
* ``common``: figures, legends, colours, number formatting.

matplotlib is imported lazily, inside the helpers, so the package itself does not need it
(``pip install -e ".[notebooks]"`` brings it). Every ``plot_*`` function returns a
``matplotlib.figure.Figure`` built without pyplot (no global figure registry) that renders itself
as a PNG in Jupyter: end a cell with the figure to show it. Each accepts ``ax=`` to draw into an
existing axes instead (then it returns that axes' figure), so notebooks can compose panels with
``new_figure``.

Data conventions (all plain Python / numpy, no JAX):

* head modes ``[L][H]`` ints: 0 dense, 1 XAttention, -1 streaming (as in
  ``generate(..., return_info=True).prefill_info[i]["modes"]``);
* kept fractions ``[L][H]`` floats in [0, 1] (``prefill_info[i]["kept_fraction"]``);
* block masks ``[nQb, nKb]`` bool (one head of ``xattn_select(..., return_mask=True).mask`` or
  of ``block_mask_from_modes``), query blocks aligned to the end of the key axis;
* a *series map* ``{label: [(x, y), ...]}`` for line and bar plots (``series`` builds one from
  benchmark rows).
"""

from elastic_jax.viz.common import (
    DPI,
    SeriesMap,
    color_map,
    figure_legend,
    figure_png,
    format_number,
    format_tokens,
    new_figure,
)
from elastic_jax.viz.masks import (
    causal_block_mask,
    kept_fraction,
    plot_block_masks,
    plot_heatmap,
    plot_kept_vs_length,
)
from elastic_jax.viz.performance import (
    plot_bandwidth,
    plot_grouped_bars,
    plot_latency_vs_context,
    plot_speedup,
    plot_tflops,
    plot_token_timeline,
)
from elastic_jax.viz.results import (
    BenchmarkResults,
    ResultTable,
    find_tables,
    load_benchmark_results,
    markdown_table,
    series,
    time_ms,
)
from elastic_jax.viz.router import (
    MODE_COLORS,
    MODE_LETTERS,
    MODE_NAMES,
    mode_fractions,
    plot_head_modes,
    plot_kept_fraction,
    plot_mode_mix,
    plot_router_margins,
    plot_sparsity_per_layer,
    plot_token_influence,
    sparsity_per_layer,
)

__all__ = [
    "DPI",
    "MODE_COLORS",
    "MODE_LETTERS",
    "MODE_NAMES",
    "BenchmarkResults",
    "ResultTable",
    "SeriesMap",
    "causal_block_mask",
    "color_map",
    "figure_legend",
    "figure_png",
    "find_tables",
    "format_number",
    "format_tokens",
    "kept_fraction",
    "load_benchmark_results",
    "markdown_table",
    "mode_fractions",
    "new_figure",
    "plot_bandwidth",
    "plot_block_masks",
    "plot_grouped_bars",
    "plot_head_modes",
    "plot_heatmap",
    "plot_kept_fraction",
    "plot_kept_vs_length",
    "plot_latency_vs_context",
    "plot_mode_mix",
    "plot_router_margins",
    "plot_sparsity_per_layer",
    "plot_speedup",
    "plot_tflops",
    "plot_token_influence",
    "plot_token_timeline",
    "series",
    "sparsity_per_layer",
    "time_ms",
]
