"""One module per subcommand; each defines ``register(app)`` (see ``zturbo.cli``)."""
