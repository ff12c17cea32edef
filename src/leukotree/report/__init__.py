"""Presentation: report tables (one number formatter), HTML pages (one stylesheet,
everything escaped), console output, plots and the per-patient report.

Modules are imported where needed; ``leukotree.report.patient`` pulls in inference."""
