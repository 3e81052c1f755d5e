"""One module per method: <Method>Config + <Method>Trainer."""
