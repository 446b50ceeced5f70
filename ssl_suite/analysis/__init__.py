"""Analysis tools: conditions and diagnostics computed offline from hyper-parameters or runs."""

from .adam_conditions import (Clause, ConditionReport, CounterexampleRun, check_schedule,
                              check_sufficient_condition, classic_adam, minibatch_stationarity,
                              rate_proxy, reddi_adam, reddi_beta2, reddi_counterexample,
                              reddi_generic_adam, reddi_gradients)

__all__ = ["Clause", "ConditionReport", "CounterexampleRun", "check_schedule",
           "check_sufficient_condition", "classic_adam", "minibatch_stationarity", "rate_proxy",
           "reddi_adam", "reddi_beta2", "reddi_counterexample", "reddi_generic_adam",
           "reddi_gradients"]
