"""Who may call and how much: the API key and stream tokens (access, tokens, token_api),
and bounds on what one client may hold (limits, deadlines)."""
