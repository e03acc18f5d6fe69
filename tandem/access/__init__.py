"""Access control: API keys with scopes, checked once per request for both HTTP paths."""
