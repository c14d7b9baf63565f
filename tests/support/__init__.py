"""What tests share, in one place: real servers and engines (`server`), synthetic adapters
(`adapters`), Character Cards (`cards`) and chat exports (`exports`). The fixtures that use
them are in tests/conftest.py."""
