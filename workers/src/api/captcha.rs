//! The arithmetic captcha in front of the hidden path.
//!
//! Before a buyer may get a sale's hidden path they solve a small formula
//! such as `7 + 3 x 2 = ?` rendered as a PNG. It spreads the rush over a few
//! seconds of human reading and makes scripted buyers pay for OCR. The
//! answer is kept server-side only, at `KeySchema.sale(id).captcha(user)`
//! for `api.captcha_ttl_secs`; a new captcha replaces the previous one, and
//! the path route consumes it whatever the outcome (one try per captcha).
//!
//! Rendering uses the `image` crate for the pixel buffer and PNG encoding,
//! with a small built-in 5x7 bitmap font (no font file to ship or load),
//! drawn scaled with per-glyph jitter, random colours, noise lines and
//! speckles.

use std::io::Cursor;

use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use image::{ImageFormat, Rgb, RgbImage};
use rand::Rng;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::identity::Identity;
use super::problem::{parse_sale_id, Problem, ProblemBody, SaleIdParam};
use super::{sales_cache, ApiState};

/// A formula and its answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Formula {
    /// What is drawn, e.g. `7 + 3 x 2 = ?`.
    pub text: String,
    pub answer: i64,
}

/// A random `a op b op c` formula, `op` in `+ - x`, with usual precedence
/// (`x` first) and a non-negative answer so buyers never type a sign.
pub fn random_formula<R: Rng>(rng: &mut R) -> Formula {
    loop {
        let a: i64 = rng.random_range(1..=9);
        let b: i64 = rng.random_range(1..=9);
        let c: i64 = rng.random_range(1..=9);
        let ops = ['+', '-', 'x'];
        let op1 = ops[rng.random_range(0..3)];
        let op2 = ops[rng.random_range(0..3)];
        let answer = evaluate(a, op1, b, op2, c);
        if answer >= 0 {
            return Formula {
                text: format!("{a} {op1} {b} {op2} {c} = ?"),
                answer,
            };
        }
    }
}

fn apply(x: i64, op: char, y: i64) -> i64 {
    match op {
        '+' => x + y,
        '-' => x - y,
        _ => x * y,
    }
}

/// `a op1 b op2 c` with `x` binding tighter than `+`/`-`.
pub fn evaluate(a: i64, op1: char, b: i64, op2: char, c: i64) -> i64 {
    if op2 == 'x' && op1 != 'x' {
        apply(a, op1, b * c)
    } else {
        apply(apply(a, op1, b), op2, c)
    }
}

/// 5x7 glyphs, one byte per row, low 5 bits used (bit 4 = leftmost).
fn glyph(c: char) -> Option<[u8; 7]> {
    Some(match c {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        '+' => [0x00, 0x04, 0x04, 0x1F, 0x04, 0x04, 0x00],
        '-' => [0x00, 0x00, 0x00, 0x1F, 0x00, 0x00, 0x00],
        'x' => [0x00, 0x11, 0x0A, 0x04, 0x0A, 0x11, 0x00],
        '=' => [0x00, 0x00, 0x1F, 0x00, 0x1F, 0x00, 0x00],
        '?' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x00, 0x04],
        _ => return None,
    })
}

const SCALE: u32 = 3;
const ADVANCE: u32 = 6 * SCALE;
const MARGIN: u32 = 12;
const HEIGHT: u32 = 7 * SCALE + 2 * MARGIN + 8;

fn line(img: &mut RgbImage, (x0, y0): (i64, i64), (x1, y1): (i64, i64), color: Rgb<u8>) {
    // Bresenham.
    let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
    let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
    let (mut x, mut y, mut err) = (x0, y0, dx + dy);
    loop {
        if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
            img.put_pixel(x as u32, y as u32, color);
        }
        if x == x1 && y == y1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

/// Draws `text` and encodes it as PNG.
pub fn render_png<R: Rng>(rng: &mut R, text: &str) -> Result<Vec<u8>, image::ImageError> {
    let width = text.chars().count() as u32 * ADVANCE + 2 * MARGIN;
    let mut img = RgbImage::from_pixel(width, HEIGHT, Rgb([245, 245, 240]));
    // Background speckles.
    for _ in 0..(width * HEIGHT / 12) {
        let (x, y) = (rng.random_range(0..width), rng.random_range(0..HEIGHT));
        let v = rng.random_range(170..230);
        img.put_pixel(x, y, Rgb([v, v, rng.random_range(170..230)]));
    }
    for (i, c) in text.chars().enumerate() {
        let Some(rows) = glyph(c) else { continue };
        let color = Rgb([
            rng.random_range(0..110),
            rng.random_range(0..110),
            rng.random_range(0..110),
        ]);
        let x0 = MARGIN + i as u32 * ADVANCE + rng.random_range(0..3);
        let y0 = MARGIN + rng.random_range(0..8);
        for (r, bits) in rows.iter().enumerate() {
            for col in 0..5u32 {
                if bits & (0x10 >> col) == 0 {
                    continue;
                }
                for dy in 0..SCALE {
                    for dx in 0..SCALE {
                        let (x, y) = (x0 + col * SCALE + dx, y0 + r as u32 * SCALE + dy);
                        if x < width && y < HEIGHT {
                            img.put_pixel(x, y, color);
                        }
                    }
                }
            }
        }
    }
    for _ in 0..6 {
        let from = (0, rng.random_range(0..HEIGHT as i64));
        let to = (width as i64 - 1, rng.random_range(0..HEIGHT as i64));
        let color = Rgb([
            rng.random_range(60..200),
            rng.random_range(60..200),
            rng.random_range(60..200),
        ]);
        line(&mut img, from, to, color);
    }
    let mut png = Vec::new();
    img.write_to(&mut Cursor::new(&mut png), ImageFormat::Png)?;
    Ok(png)
}

/// A PNG image (in the document: binary, not a JSON array of bytes).
#[derive(utoipa::ToSchema)]
#[schema(value_type = String, format = Binary)]
#[allow(dead_code)]
pub struct CaptchaPng(Vec<u8>);

/// `/api/v1/sales/{id}/captcha`.
pub fn router() -> OpenApiRouter<ApiState> {
    OpenApiRouter::new().routes(routes!(captcha))
}

/// A new arithmetic captcha for this buyer and sale
///
/// Its answer is kept server-side (300 s) for `issue_path`; a new captcha
/// replaces the previous one.
#[utoipa::path(
    get,
    path = "/api/v1/sales/{id}/captcha",
    tag = "sales",
    operation_id = "get_captcha",
    params(SaleIdParam),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A PNG of an arithmetic formula", content_type = "image/png", body = CaptchaPng),
        (status = 404, description = "No such sale", body = ProblemBody),
    ),
)]
async fn captcha(
    State(state): State<ApiState>,
    who: Identity,
    Path(raw): Path<String>,
) -> Result<Response, Problem> {
    let sale_id = parse_sale_id(&raw)?;
    if sales_cache::cached_sale(&state, sale_id).await?.is_none() {
        return Err(Problem::not_found("no such sale"));
    }
    let (answer, png) = state
        .cpu()
        .run(|| {
            let mut rng = rand::rng();
            let formula = random_formula(&mut rng);
            render_png(&mut rng, &formula.text).map(|png| (formula.answer, png))
        })
        .await
        .map_err(Problem::internal)?
        .map_err(Problem::internal)?;
    let mut redis = state.redis();
    let _: () = redis::cmd("SET")
        .arg(state.keys().sale(sale_id).captcha(who.user_id))
        .arg(answer)
        .arg("EX")
        .arg(state.config().captcha_ttl_secs.max(1))
        .query_async(&mut redis)
        .await
        .map_err(Problem::internal)?;
    Ok((
        [
            (header::CONTENT_TYPE, "image/png"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        png,
    )
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn precedence() {
        assert_eq!(evaluate(7, '+', 3, 'x', 2), 13);
        assert_eq!(evaluate(7, 'x', 3, '+', 2), 23);
        assert_eq!(evaluate(7, '-', 3, '-', 2), 2);
        assert_eq!(evaluate(2, 'x', 3, 'x', 4), 24);
    }

    #[test]
    fn formulas_are_drawable_and_non_negative() {
        let mut rng = rand::rng();
        for _ in 0..200 {
            let f = random_formula(&mut rng);
            assert!(f.answer >= 0);
            assert!(
                f.text.chars().all(|c| c == ' ' || glyph(c).is_some()),
                "{}",
                f.text
            );
        }
        let png = render_png(&mut rng, "7 + 3 x 2 = ?").unwrap();
        let img = image::load_from_memory_with_format(&png, ImageFormat::Png).unwrap();
        assert_eq!(img.height(), HEIGHT);
    }
}
