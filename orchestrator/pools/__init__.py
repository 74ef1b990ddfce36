"""Pool providers (static, local, kubernetes): see base.py."""
