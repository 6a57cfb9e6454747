"""The HTTP surface: a thin Litestar app that translates requests into calls on the Runtime."""
