"""Code every app shares (auth and API tokens, the outbound-connection guard, the HTTP client
base): the one part of the project package that apps may import (see .importlinter)."""
