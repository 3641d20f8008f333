"""Host names and URLs as the policy sees them.

The gate reads a URL with Python's `urllib.parse`; the SDKs send requests through urllib3, which
reads some URLs differently (`http://a.example\\@127.0.0.1/` is 127.0.0.1 to the first, a.example
to the second). `ambiguous_url` refuses every URL whose host the two could disagree on, so the
host the gate judges is the host the request goes to.
"""

from __future__ import annotations

import ipaddress
import re
from urllib.parse import urlsplit


def is_loopback_host(host: str | None) -> bool:
    """True for localhost and any loopback address (127.0.0.0/8, ::1)."""
    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# A host name (ASCII labels) or a bracketed IPv6 literal, then an optional port: nothing else
# (no user, no `@`, no percent-escapes) may stand between `//` and the path.
_PLAIN_AUTHORITY = re.compile(r"^(?:[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.?|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?$")


def ambiguous_url(url: str) -> str | None:
    """Why the host of `url` could be read differently by the gate and by the HTTP client, or None.

    Refused: a backslash, a space or a control character anywhere (urllib drops tabs and newlines
    and stops the host at `/` only; urllib3 stops it at a backslash), and an authority that is not
    a plain `host[:port]` (a user part, `@`, a percent-escape, a non-ASCII host).
    """
    if "\\" in url:
        return "it holds a backslash"
    if any(ch.isspace() or ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        return "it holds a space or a control character"
    if not _PLAIN_AUTHORITY.match(urlsplit(url).netloc):
        return "its host part is not a plain host name or IP address with an optional port (no user part, no `@`)"
    return None


# Clouds under a jurisdiction outside the EU, by the domains their storage and KMS endpoints use.
# The parent company decides: a European region, or a European subsidiary, of a provider seated in
# the US or China is still reachable by that country's law (e.g. the US CLOUD Act), so every domain
# of the group is listed, EU-branded ones included. Built in and not overridable: a provider
# catalog file cannot make one of these hosts acceptable (the gate checks this list first).
NON_EU_CLOUDS: dict[str, tuple[str, ...]] = {
    "Amazon Web Services": ("amazonaws.com", "amazonaws.com.cn", "amazonaws.eu", "api.aws", "on.aws",
                            "cloudfront.net", "awsglobalaccelerator.com", "amazon.com"),
    "Google Cloud": ("googleapis.com", "googleusercontent.com", "appspot.com", "cloud.goog", "run.app",
                     "google.com", "withgoogle.com"),
    "Microsoft Azure": ("windows.net", "azure.com", "azure.net", "azureedge.net", "azurefd.net", "azurewebsites.net",
                        "cloudapp.net", "microsoft.com", "chinacloudapi.cn", "usgovcloudapi.net"),
    "Oracle Cloud": ("oraclecloud.com", "oraclecloud.eu", "oracle.com"),
    "IBM Cloud": ("appdomain.cloud", "ibm.com", "softlayer.net", "bluemix.net"),
    "Alibaba Cloud": ("aliyuncs.com", "alibabacloud.com", "aliyun.com"),
    "DigitalOcean": ("digitaloceanspaces.com", "digitalocean.com", "ondigitalocean.app"),
    "Cloudflare": ("cloudflarestorage.com", "r2.dev", "cloudflare.com", "workers.dev"),
    "Backblaze": ("backblazeb2.com", "backblaze.com"),
    "Wasabi": ("wasabisys.com",),
    "Akamai (Linode)": ("linodeobjects.com", "linode.com", "akamai.com"),
    "Vultr": ("vultrobjects.com", "vultr.com"),
    "Tencent Cloud": ("myqcloud.com", "tencentcos.cn", "tencentcloudapi.com"),
    "Huawei Cloud": ("myhuaweicloud.com", "huaweicloud.com"),
}


def non_eu_cloud(host: str | None) -> str | None:
    """The name of the non-EU cloud `host` belongs to (itself or a subdomain of one of its
    domains, see `NON_EU_CLOUDS`), or None."""
    if not host:
        return None
    host = host.lower().rstrip(".")
    for cloud, domains in NON_EU_CLOUDS.items():
        if any(host == d or host.endswith("." + d) for d in domains):
            return cloud
    return None


def public_ip_literal(host: str | None) -> bool:
    """True when `host` is a public IP address: it names no operator, so no catalog or list can
    say whose network, or which jurisdiction, it is (private and loopback addresses are the
    operator's own network)."""
    try:
        return bool(host) and ipaddress.ip_address(host.strip("[]")).is_global
    except ValueError:
        return False


# PKCS#11 libraries that are clients of a cloud HSM service outside the EU: the key they hold is
# in that cloud, whatever host the configuration names (a PKCS#11 module has no endpoint to judge).
NON_EU_CLOUD_PKCS11_MODULES: dict[str, str] = {
    "libcloudhsm_pkcs11": "AWS CloudHSM",
    "libkmsp11": "Google Cloud KMS",
}


def non_eu_cloud_pkcs11_module(module: str) -> str | None:
    """The cloud HSM service whose client library `module` (a path) is, or None."""
    name = module.replace("\\", "/").rsplit("/", 1)[-1].lower()
    for stem, service in NON_EU_CLOUD_PKCS11_MODULES.items():
        if name.startswith(stem):
            return service
    return None
