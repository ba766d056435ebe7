"""Shared pytest configuration: the integration harness's fixtures (``cluster_factory``)."""

pytest_plugins = ["fdpd.testing.pytest_plugin"]
