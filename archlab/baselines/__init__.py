"""archlab's own baseline plugins, registered through entry points exactly like third-party ones."""
