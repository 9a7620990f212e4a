"""`python -m imkd_deploy ...` runs the `imkd` CLI where the console script is not installed
(a checkout on PYTHONPATH, e.g. on a GPU machine that cannot pip install)."""

from imkd_deploy.cli import main

main()
