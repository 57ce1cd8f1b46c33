"""A plugin whose dependency is missing (the broken-plugin test): importing it raises ImportError."""

import amisbench_dependency_that_is_not_installed  # noqa: F401
