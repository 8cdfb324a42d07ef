"""Device-compliance tokens: key loading, verification (pure: time is passed in), dev minting."""
