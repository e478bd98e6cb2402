"""Attention over cells: galleries, field overlays, cohort views, faithfulness, and a static HTML report."""
