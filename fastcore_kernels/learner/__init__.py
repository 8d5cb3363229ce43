"""A thin fastai-style training layer (Learner, callbacks, metrics, schedules) on fastcore_kernels' kernels."""

from fastcore_kernels.learner.callbacks import (
    Callback, CancelBatchException, CancelEpochException, CancelFitException, CancelTrainException,
    CancelValidException, EarlyStopping, GradientClip, MixedPrecision, NonFiniteLossError, ProgressCallback,
    Recorder, SaveModel, Timer,
)
from fastcore_kernels.learner.data import DataLoaders, TensorLoader
from fastcore_kernels.learner.interpret import ClassificationInterpretation, grad_cam, hook_output, hook_outputs
from fastcore_kernels.learner.learner import Learner, ParamScheduler, SuggestedLRs, load_learner
from fastcore_kernels.learner.metrics import (
    Metric, accuracy, accuracy_multi, dice, error_rate, exp_rmspe, fbeta, mse, rmse,
)
from fastcore_kernels.learner.schedule import combine_scheds, combined_cos, one_cycle, sched_cos, sched_exp, sched_lin

__all__ = [
    "Callback", "CancelBatchException", "CancelEpochException", "CancelFitException", "CancelTrainException",
    "CancelValidException", "ClassificationInterpretation", "DataLoaders", "EarlyStopping", "GradientClip",
    "Learner", "Metric", "MixedPrecision", "NonFiniteLossError", "ParamScheduler", "ProgressCallback", "Recorder",
    "SaveModel", "SuggestedLRs", "TensorLoader", "Timer", "accuracy", "accuracy_multi", "combine_scheds",
    "combined_cos", "dice", "error_rate", "exp_rmspe", "fbeta", "grad_cam", "hook_output", "hook_outputs",
    "load_learner", "mse", "one_cycle", "rmse", "sched_cos", "sched_exp", "sched_lin",
]
