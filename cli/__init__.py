"""The typer front end of deploy-prune (installed as deploy_prune.cli)."""
