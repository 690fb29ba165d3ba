"""The package version, in a leaf module: what needs it imports this, not the package."""

VERSION = "0.1.0"
