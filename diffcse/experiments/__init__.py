"""Orchestration over the features: multi-seed experiment grids (`diffcse experiment`) and run reports
(`diffcse report`). It may import training and evaluation; no feature imports it.
"""
