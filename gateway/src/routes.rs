//! The route table: method + path pattern → what handles the request.
//!
//! Patterns are literal segments, `{name}` (one segment, captured) and a
//! trailing `{*name}` (the rest, captured). Routes are tried in config order,
//! first match wins, so specific routes go before catch-alls. Captured
//! parameters reach the Lua rules as `req.params`.

use seckill_contracts::config::RouteConfig;

/// One parsed segment of a pattern.
#[derive(Debug, Clone, PartialEq)]
enum Segment {
    Literal(String),
    Param(String),
    Rest(String),
}

/// A route ready for matching.
#[derive(Debug, Clone)]
pub struct Route {
    pub name: String,
    /// Upper-case method, or `None` for any.
    pub method: Option<String>,
    pub pool: Option<String>,
    pub public: bool,
    /// Answered from the web files (`RouteConfig::files`).
    pub files: bool,
    /// Micro-cache freshness of its pages (`RouteConfig::cache_ms`; 0: off).
    pub cache_ms: u64,
    segments: Vec<Segment>,
}

/// A successful match: the route and its captured parameters.
#[derive(Debug, Clone)]
pub struct Matched<'a> {
    pub route: &'a Route,
    pub params: Vec<(String, String)>,
}

/// The outcome of [`RouteTable::resolve`].
#[derive(Debug)]
pub enum Resolved<'a> {
    Route(Matched<'a>),
    /// The path is routed, for these methods only.
    MethodNotAllowed(Vec<String>),
    NotFound,
}

/// Why a pattern is unusable.
#[derive(Debug, thiserror::Error)]
#[error("route `{route}`: {reason}")]
pub struct RouteError {
    route: String,
    reason: String,
}

/// All routes, in match order.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    pub fn new(configs: &[RouteConfig]) -> Result<RouteTable, RouteError> {
        let routes = configs.iter().map(Route::parse).collect::<Result<_, _>>()?;
        Ok(RouteTable { routes })
    }

    /// The first route matching `method` and `path` (no query string).
    pub fn find(&self, method: &str, path: &str) -> Option<Matched<'_>> {
        self.routes.iter().find_map(|r| r.matches(method, path))
    }

    /// What the table answers for `method` and `path`: the route, or which
    /// methods the path takes (a 405 with `Allow`), or nothing (a 404).
    ///
    /// A path that a method-bound route claims belongs to those methods: a
    /// catch-all route (`method = "*"`) does not take other methods of it,
    /// so an undeclared method on a public path is a 405, not whatever the
    /// catch-all would answer (a 401 for a token it needs).
    pub fn resolve(&self, method: &str, path: &str) -> Resolved<'_> {
        match self.find(method, path) {
            Some(m) if m.route.method.is_some() => Resolved::Route(m),
            // A catch-all after method-bound routes of this path (`/api/v1/
            // {*rest}` after `GET /api/v1/sales`) does not take the methods
            // they leave out; one listed before them (`* /ops/api/{*rest}`
            // before `GET /ops/{*asset}`) takes its whole prefix.
            Some(m) => {
                let before = self
                    .routes
                    .iter()
                    .position(|r| std::ptr::eq(r, m.route))
                    .unwrap_or(0);
                match self.allowed_methods_among(&self.routes[..before], path) {
                    methods if methods.is_empty() => Resolved::Route(m),
                    methods => Resolved::MethodNotAllowed(methods),
                }
            }
            None => match self.allowed_methods(path) {
                methods if methods.is_empty() => Resolved::NotFound,
                methods => Resolved::MethodNotAllowed(methods),
            },
        }
    }

    /// The methods routes take for `path`, for the `Allow` header of a
    /// 405 when none takes the request's method. Empty when no route has
    /// this path (a 404).
    pub fn allowed_methods(&self, path: &str) -> Vec<String> {
        self.allowed_methods_among(&self.routes, path)
    }

    fn allowed_methods_among(&self, routes: &[Route], path: &str) -> Vec<String> {
        let mut methods: Vec<String> = Vec::new();
        for route in routes {
            let Some(m) = &route.method else { continue };
            if route.matches_path(path).is_none() {
                continue;
            }
            let also_head = (m == "GET").then(|| "HEAD".to_string());
            for m in std::iter::once(m.clone()).chain(also_head) {
                if !methods.contains(&m) {
                    methods.push(m);
                }
            }
        }
        methods
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }
}

impl Route {
    fn parse(config: &RouteConfig) -> Result<Route, RouteError> {
        let err = |reason: &str| RouteError {
            route: config.name.clone(),
            reason: reason.to_string(),
        };
        let parts: Vec<&str> = config.path.trim_start_matches('/').split('/').collect();
        let mut segments = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let seg = if let Some(inner) = part.strip_prefix('{').and_then(|p| p.strip_suffix('}'))
            {
                if let Some(rest) = inner.strip_prefix('*') {
                    if i + 1 != parts.len() {
                        return Err(err("`{*name}` must be the last segment"));
                    }
                    Segment::Rest(rest.to_string())
                } else {
                    Segment::Param(inner.to_string())
                }
            } else {
                if part.contains(['{', '}']) {
                    return Err(err("a `{param}` must be a whole segment"));
                }
                Segment::Literal((*part).to_string())
            };
            if matches!(&seg, Segment::Param(n) | Segment::Rest(n) if n.is_empty()) {
                return Err(err("parameter names must not be empty"));
            }
            segments.push(seg);
        }
        let method = match config.method.as_str() {
            "*" => None,
            m => Some(m.to_ascii_uppercase()),
        };
        Ok(Route {
            name: config.name.clone(),
            method,
            pool: config.pool.clone(),
            public: config.public,
            files: config.files,
            cache_ms: config.cache_ms,
            segments,
        })
    }

    /// A GET route answers HEAD too (what every HTTP server does; the
    /// backends do).
    fn accepts(&self, method: &str) -> bool {
        match &self.method {
            None => true,
            Some(m) => {
                m.eq_ignore_ascii_case(method)
                    || (m == "GET" && method.eq_ignore_ascii_case("HEAD"))
            }
        }
    }

    fn matches<'a>(&'a self, method: &str, path: &str) -> Option<Matched<'a>> {
        if !self.accepts(method) {
            return None;
        }
        self.matches_path(path)
    }

    fn matches_path<'a>(&'a self, path: &str) -> Option<Matched<'a>> {
        let path = path.strip_prefix('/')?;
        let mut parts = path.split('/');
        let mut params = Vec::new();
        for (i, seg) in self.segments.iter().enumerate() {
            match seg {
                Segment::Rest(name) => {
                    // Everything from here on, joined back.
                    let consumed: usize = self.segments[..i]
                        .iter()
                        .zip(path.split('/'))
                        .map(|(_, p)| p.len() + 1)
                        .sum();
                    let rest = path.get(consumed..).unwrap_or("");
                    if rest.is_empty() {
                        return None;
                    }
                    params.push((name.clone(), rest.to_string()));
                    return Some(Matched {
                        route: self,
                        params,
                    });
                }
                Segment::Literal(lit) => {
                    if parts.next()? != lit {
                        return None;
                    }
                }
                Segment::Param(name) => {
                    let value = parts.next()?;
                    if value.is_empty() {
                        return None;
                    }
                    params.push((name.clone(), value.to_string()));
                }
            }
        }
        if parts.next().is_some() {
            return None;
        }
        Some(Matched {
            route: self,
            params,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(name: &str, method: &str, path: &str) -> RouteConfig {
        RouteConfig::local(name, method, path)
    }

    fn table() -> RouteTable {
        RouteTable::new(&[
            route("seckill", "POST", "/api/v1/seckill/{path}/{sale_id}"),
            route("list", "GET", "/api/v1/sales"),
            route("rest", "*", "/api/v1/{*rest}"),
        ])
        .unwrap()
    }

    #[test]
    fn captures_params_in_order() {
        let t = table();
        let m = t.find("POST", "/api/v1/seckill/abc/42").unwrap();
        assert_eq!(m.route.name, "seckill");
        assert_eq!(
            m.params,
            vec![
                ("path".into(), "abc".into()),
                ("sale_id".into(), "42".into())
            ]
        );
    }

    #[test]
    fn method_and_shape_must_match() {
        let t = table();
        assert_eq!(
            t.find("GET", "/api/v1/seckill/abc/42").unwrap().route.name,
            "rest"
        );
        assert_eq!(
            t.find("POST", "/api/v1/seckill/abc/42/x")
                .unwrap()
                .route
                .name,
            "rest"
        );
        assert_eq!(t.find("GET", "/api/v1/sales").unwrap().route.name, "list");
        assert!(t.find("GET", "/other").is_none());
        assert!(t.find("GET", "/api/v1/").is_none());
        assert!(t.find("POST", "/api/v1/seckill//42").unwrap().route.name == "rest");
    }

    #[test]
    fn head_takes_get_routes_and_other_methods_learn_what_is_allowed() {
        let t = table();
        assert_eq!(t.find("HEAD", "/api/v1/sales").unwrap().route.name, "list");
        let only = RouteTable::new(&[route("jwks", "GET", "/.well-known/jwks.json")]).unwrap();
        assert!(only.find("TRACE", "/.well-known/jwks.json").is_none());
        assert_eq!(
            only.allowed_methods("/.well-known/jwks.json"),
            ["GET", "HEAD"]
        );
        assert!(only.allowed_methods("/elsewhere").is_empty());
    }

    #[test]
    fn a_catch_all_does_not_take_other_methods_of_a_claimed_path() {
        let t = table();
        let allowed = |r: Resolved| match r {
            Resolved::MethodNotAllowed(m) => m,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            allowed(t.resolve("TRACE", "/api/v1/sales")),
            ["GET", "HEAD"]
        );
        assert!(
            matches!(t.resolve("DELETE", "/api/v1/orders/9"), Resolved::Route(m) if m.route.name == "rest")
        );
        assert!(
            matches!(t.resolve("GET", "/api/v1/sales"), Resolved::Route(m) if m.route.name == "list")
        );
        assert!(matches!(t.resolve("GET", "/elsewhere"), Resolved::NotFound));
    }

    #[test]
    fn a_catch_all_listed_first_takes_its_whole_prefix() {
        let t = RouteTable::new(&[
            route("ops_api", "*", "/ops/api/{*rest}"),
            route("ops_assets", "GET", "/ops/{*asset}"),
        ])
        .unwrap();
        for method in ["GET", "POST"] {
            assert!(
                matches!(t.resolve(method, "/ops/api/rules/reload"), Resolved::Route(m) if m.route.name == "ops_api"),
                "{method}"
            );
        }
        assert!(
            matches!(t.resolve("GET", "/ops/ops.js"), Resolved::Route(m) if m.route.name == "ops_assets")
        );
        assert!(matches!(
            t.resolve("POST", "/ops/ops.js"),
            Resolved::MethodNotAllowed(_)
        ));
    }

    #[test]
    fn rest_captures_the_remainder() {
        let t = table();
        let m = t.find("DELETE", "/api/v1/orders/9/cancel").unwrap();
        assert_eq!(m.params, vec![("rest".into(), "orders/9/cancel".into())]);
    }

    #[test]
    fn bad_patterns_are_refused() {
        assert!(RouteTable::new(&[route("x", "GET", "/a/{*r}/b")]).is_err());
        assert!(RouteTable::new(&[route("x", "GET", "/a/x{y}")]).is_err());
        assert!(RouteTable::new(&[route("x", "GET", "/a/{}")]).is_err());
    }
}
