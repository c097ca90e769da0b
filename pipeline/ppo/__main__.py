from pipeline.ppo import cli

cli()
