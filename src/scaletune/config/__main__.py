"""`python -m scaletune.config`: print the configuration reference (README.md's section is this output)."""

from . import reference_markdown

print(reference_markdown())
