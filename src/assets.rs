//! The browser client's files (`web/`) as served: embedded in the binary, the page told this
//! server's settings (how long messages are kept), each file compressed once with gzip when the
//! server starts, with a strong `ETag` so that a browser revalidating its copy (they are served
//! `no-cache`, so an upgrade reaches every browser on its next load) gets `304` and no body.

use std::collections::HashMap;
use std::io::Write as _;

use actix_web::http::header::{self, HeaderMap};
use actix_web::web::{self, Bytes};
use actix_web::{HttpRequest, HttpResponse};
use rust_embed::RustEmbed;
use sha2::{Digest as _, Sha256};

#[derive(RustEmbed)]
#[folder = "web/"]
#[exclude = "tests/*"]
struct WebAssets;

/// One file, ready to serve.
struct Asset {
    mime: String,
    /// Strong validator of the file's bytes (the first 16 bytes of its SHA-256, in hex).
    etag: String,
    plain: Bytes,
    /// The gzip encoding, when it is smaller by a tenth or more.
    gzip: Option<Bytes>,
}

/// Where the page says how many days messages are kept (`retention.days`).
const RETENTION_DAYS: &str = "{{retention_days}}";

/// Every file of the browser client, prepared when the server starts (about 40 KB of text,
/// a few milliseconds).
pub struct Assets {
    files: HashMap<String, Asset>,
}

impl Assets {
    /// The files, the page saying that messages are kept `retention_days` days.
    pub fn new(retention_days: u32) -> Self {
        let files = WebAssets::iter()
            .filter_map(|path| {
                let file = WebAssets::get(&path)?;
                let mut plain = file.data.into_owned();
                if path.ends_with(".html") {
                    let text = String::from_utf8_lossy(&plain)
                        .replace(RETENTION_DAYS, &retention_days.to_string());
                    plain = text.into_bytes();
                }
                let hash = Sha256::digest(&plain);
                let etag: String = hash[..16].iter().map(|b| format!("{b:02x}")).collect();
                let gzip = gzip(&plain).filter(|g| g.len() * 10 <= plain.len() * 9);
                let asset = Asset {
                    mime: mime_guess::from_path(path.as_ref())
                        .first_or_octet_stream()
                        .to_string(),
                    etag: format!("\"{etag}\""),
                    plain: Bytes::from(plain),
                    gzip: gzip.map(Bytes::from),
                };
                Some((path.into_owned(), asset))
            })
            .collect();
        Self { files }
    }
}

fn gzip(data: &[u8]) -> Option<Vec<u8>> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    encoder.write_all(data).ok()?;
    encoder.finish().ok()
}

/// Whether `Accept-Encoding` accepts gzip (named, or `*`, without `q=0`).
fn accepts_gzip(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::ACCEPT_ENCODING)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|coding| {
            let mut parts = coding.split(';').map(str::trim);
            let name = parts.next().unwrap_or("");
            let refused = parts.any(|p| {
                p.strip_prefix("q=")
                    .and_then(|q| q.parse::<f32>().ok())
                    .is_some_and(|q| q <= 0.0)
            });
            (name.eq_ignore_ascii_case("gzip") || name == "*") && !refused
        })
}

/// Whether `If-None-Match` names this validator (weakly compared, as RFC 9110 says for it).
fn still_fresh(headers: &HeaderMap, etag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .any(|tag| tag == "*" || tag.trim_start_matches("W/") == etag)
}

/// `GET`/`HEAD` of a file of the browser client; `/` is `index.html`.
pub async fn serve(req: HttpRequest, assets: web::Data<Assets>) -> HttpResponse {
    let path = req.match_info().query("path");
    let path = if path.is_empty() { "index.html" } else { path };
    let Some(asset) = assets.files.get(path) else {
        return HttpResponse::NotFound()
            .content_type("text/plain; charset=utf-8")
            .body("not found\n");
    };
    let fresh = still_fresh(req.headers(), &asset.etag);
    let mut response = if fresh {
        HttpResponse::NotModified()
    } else {
        HttpResponse::Ok()
    };
    response
        .insert_header((header::ETAG, asset.etag.as_str()))
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header((header::VARY, "Accept-Encoding"));
    if fresh {
        return response.finish();
    }
    response.content_type(asset.mime.as_str());
    match &asset.gzip {
        Some(gz) if accepts_gzip(req.headers()) => response
            .insert_header((header::CONTENT_ENCODING, "gzip"))
            .body(gz.clone()),
        _ => response.body(asset.plain.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::HeaderValue;

    fn headers(name: header::HeaderName, values: &[&str]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for v in values {
            map.append(name.clone(), HeaderValue::from_str(v).unwrap());
        }
        map
    }

    #[test]
    fn gzip_is_used_only_when_the_client_accepts_it() {
        let yes = ["gzip", "deflate, gzip;q=0.5", "br, GZIP", "*", "gzip;q=1.0"];
        for v in yes {
            assert!(accepts_gzip(&headers(header::ACCEPT_ENCODING, &[v])), "{v}");
        }
        for v in [
            "",
            "identity",
            "br, deflate",
            "gzip;q=0",
            "gzip; q=0.0",
            "xgzip",
        ] {
            assert!(
                !accepts_gzip(&headers(header::ACCEPT_ENCODING, &[v])),
                "{v}"
            );
        }
        assert!(!accepts_gzip(&HeaderMap::new()));
    }

    #[test]
    fn if_none_match_names_the_validator_in_any_written_form() {
        let etag = "\"0123abcd\"";
        for v in ["\"0123abcd\"", "W/\"0123abcd\"", "\"x\", \"0123abcd\"", "*"] {
            assert!(
                still_fresh(&headers(header::IF_NONE_MATCH, &[v]), etag),
                "{v}"
            );
        }
        for v in ["\"0123abce\"", "0123abcd", "\"0123abcd"] {
            assert!(
                !still_fresh(&headers(header::IF_NONE_MATCH, &[v]), etag),
                "{v}"
            );
        }
    }

    #[test]
    fn every_file_has_a_validator_and_text_files_a_smaller_gzip() {
        let assets = Assets::new(30);
        for (path, asset) in &assets.files {
            assert_eq!(asset.etag.len(), 34, "{path}");
            if path.ends_with(".js") || path.ends_with(".html") || path.ends_with(".css") {
                let gz = asset.gzip.as_ref().expect("text compresses");
                let mut back = Vec::new();
                std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut back)
                    .unwrap();
                assert_eq!(back, asset.plain, "{path}");
            }
        }
        assert!(assets.files.contains_key("index.html"));
    }

    #[test]
    fn the_page_says_how_long_this_server_keeps_messages() {
        let page = |days| {
            let assets = Assets::new(days);
            let page = &assets.files["index.html"];
            (
                String::from_utf8(page.plain.to_vec()).unwrap(),
                page.etag.clone(),
            )
        };
        let (seven, seven_tag) = page(7);
        let (thirty, thirty_tag) = page(30);
        assert!(seven.contains("after 7 days") && thirty.contains("after 30 days"));
        assert!(!seven.contains("{{") && !thirty.contains("{{"));
        assert_ne!(seven_tag, thirty_tag, "another page, another validator");
    }
}
