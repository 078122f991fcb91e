"""enserve: the command line that reaches every package (lazily, per subcommand)."""
