"""The application layer: the CLI, and the demo and benchmark pipelines it runs. The library never imports it."""
