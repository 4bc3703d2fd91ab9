"""csmstream.integrations: Telnyx media-stream bridge and call routing."""
