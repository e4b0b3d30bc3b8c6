"""After the sweep: the best trials, export and registry hand-off, the whole-dataset analysis,
its plots and its HTML report."""
