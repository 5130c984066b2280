"""Predictable scaling (GPT-4 report, section 3): fit small runs, predict a big one.

    gptjax.scaling.fits     the fits: L(C) = a C^b + c (fit_power_law), Chinchilla's
                            L(N, D) (fit_chinchilla), loss -> accuracy (fit_sigmoid,
                            CapabilityFit), GPT-4's pass rate (fit_pass_rate), and the
                            compute of a run (training_flops, the MFU's formula)
    gptjax.scaling.ladder   a model ladder trained by train.py's job, the target's loss
                            and accuracy predicted before it trains, then checked
    gptjax.scaling.plot     scaling.png
    python -m gptjax.scaling   the command line (gptjax.cli.scaling)

    fit = gptjax.scaling.fit_power_law(compute, loss)
    fit.a, fit.b, fit.c, fit.predict(30 * max(compute)), fit.interval(30 * max(compute))

The fits are imported here; the ladder (which imports the training stack) is imported
from its module.
"""

from gptjax.scaling.fits import (
    CapabilityFit,
    ChinchillaFit,
    PassRateFit,
    PowerLawFit,
    SigmoidFit,
    fit_chinchilla,
    fit_pass_rate,
    fit_power_law,
    fit_sigmoid,
    matmul_params,
    training_flops,
)

__all__ = [
    "CapabilityFit",
    "ChinchillaFit",
    "PassRateFit",
    "PowerLawFit",
    "SigmoidFit",
    "fit_chinchilla",
    "fit_pass_rate",
    "fit_power_law",
    "fit_sigmoid",
    "matmul_params",
    "training_flops",
]
