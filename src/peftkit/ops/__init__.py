"""Pure tensor functions: fast paths beside the plain reference implementations they are tested against."""
