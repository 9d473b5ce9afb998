"""Checkers for the chapters' exercises: `check_<name>(your_function_or_class)`.

Each runs the kind of tests flowbook runs on its own code (invertibility, log-determinant against
autograd, shapes, dtypes, edge cases) on yours, in an order chosen so that a plausible mistake gets the hint
written for it. While your code is checked, the flowbook code the exercise re-implements is switched off:
calling it fails with "implement this yourself", also through a reference taken before the check (a Python
function's code is swapped in place; a torch function is caught by a torch function mode). A passing check
prints one line; a failing one raises CheckFailed, whose message a notebook shows on its own, without a
traceback. A stub that still raises NotImplementedError is not caught (tests and "Run All" expect it), but a
notebook shows it as one line too. Each checker's docstring lists the mistakes it recognises.

`grade((points, checker, *args), ...)` turns checks into points for nbgrader's autograder (see
flowbook.grading): it never raises, prints each check's line and returns the points earned.
"""
from flowbook.exercises._harness import CheckFailed, grade
from flowbook.exercises.ch1 import check_bits_per_dim, check_change_of_variables
from flowbook.exercises.ch2 import check_importance_weighted_bpd, check_logit_transform, check_vardeq_noise
from flowbook.exercises.ch3 import (check_additive_coupling, check_affine_coupling, check_checkerboard_mask,
                                    check_train_flow)
from flowbook.exercises.ch4 import check_multiscale_flow, check_split, check_squeeze
from flowbook.exercises.ch5 import check_interpolate, check_sample_images, check_temperature_latent
from flowbook.exercises.ch6 import check_actnorm, check_lu_weight, check_separation_auc
from flowbook.exercises.ch7 import check_cfm_loss, check_euler_sample, check_hutchinson_divergence
from flowbook.exercises.ch8 import check_autoregressive_inverse, check_causal_mask, check_tweedie_step

__all__ = ["CheckFailed", "grade", "check_change_of_variables", "check_bits_per_dim", "check_logit_transform",
           "check_importance_weighted_bpd", "check_vardeq_noise", "check_checkerboard_mask",
           "check_affine_coupling", "check_additive_coupling", "check_train_flow", "check_squeeze", "check_split",
           "check_multiscale_flow", "check_interpolate", "check_temperature_latent", "check_sample_images",
           "check_lu_weight", "check_actnorm", "check_separation_auc", "check_hutchinson_divergence",
           "check_cfm_loss", "check_euler_sample", "check_causal_mask", "check_autoregressive_inverse",
           "check_tweedie_step"]
