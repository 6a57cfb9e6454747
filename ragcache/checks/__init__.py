"""Fast paths checked against the slow path: shadow checks, error estimates, budgets that steer.

shadow.py        which answers are checked, how (full prefill for a blend, the engine for a
                 semantic hit), run as background work on spare engine capacity only
estimate.py      an error rate with its confidence interval, from labelled observations
blend_budget.py  per (tenant, category): the blend setting that keeps first-token
                 disagreement within epsilon, stepped up and down a ladder of settings
"""
