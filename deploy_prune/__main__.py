"""``python -m deploy_prune`` = ``deploy-prune``."""

from deploy_prune.cli.main import main

main()
