"""The decision threshold's rules, as training calls them: they live in engine.common.thresholds (the run side
retunes engines with the same rules, and imports nothing of train/); why the default rule is the robust one is
written there."""

from engine.common.thresholds import (
    MAX_REJECTED,
    REJECTION_BUDGETS,
    THRESHOLD_QUANTILE,
    THRESHOLD_RULES,
    THRESHOLD_SPREADS,
    best_thresholds,
    compare_rules,
    from_defects,
    from_good,
    max_rejected,
)

__all__ = ["THRESHOLD_RULES", "THRESHOLD_SPREADS", "THRESHOLD_QUANTILE", "MAX_REJECTED", "REJECTION_BUDGETS",
           "from_good", "from_defects", "max_rejected", "compare_rules", "best_thresholds"]
