"""One storage layer over fsspec (local folders, s3://, ...), its credentials, retries and errors."""
