"""ftkit's built-in task plugins.

Each module here is named in the ``ftkit`` entry-point group of ftkit's own ``pyproject.toml``
and discovered exactly like a third party's plugin package would be.
"""
