"""Metrics of an SR volume against its HR scan.

:mod:`.evaluate` (the ``evaluate`` subcommand's engine), :mod:`.fidelity` (PSNR Eq. 8, SSIM),
:mod:`.perceptual` (NIQE, Ma, PI through the optional pyiqa), :mod:`.morphometry` (BV/TV,
Tb.Th, Tb.Sp, Tb.N) and :mod:`.report` (tables, CSV, figures). Importing this package imports
none of them, so pyiqa stays out of ``upscale``, ``pair``, ``simulate`` and ``train``.
"""
