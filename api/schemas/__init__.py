"""Request and response schemas of the API, one module per resource (``XCreate`` / ``XPublic`` /
``XsPublic{data,count}``). Job parameters themselves are ``csra.specs`` (shared with the workers)."""
