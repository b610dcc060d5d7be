"""First-party archlab plugins: an installable distribution of its own, like any third party's."""
