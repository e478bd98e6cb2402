"""`mil` subcommands of the features stage (each module: add_arguments(parser) and run(args))."""
