"""Working on a series: denoising, the quality gate, the derived instances, dispatch."""
