"""The cloud side.

| module | job |
|---|---|
| ``receiver`` | the cloud consumer: verify, decrypt, de-duplicate, file results |
"""
