"""Build the audit hook's C hot path (ngp_research/kernel/_hook.c); everything else is in pyproject.toml.

``optional=True``: without a C compiler the package still installs and the kernel uses the same hook
written in Python (slower on file-heavy cells; ``Auditor.stats()["hook"]`` says which one runs).
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("ngp_research.kernel._hook", ["ngp_research/kernel/_hook.c"], optional=True)])
