"""The package version, in a module of its own so that the library can name it without importing the
package root (which registers the ComfyUI nodes)."""

__version__ = "0.1.0"
