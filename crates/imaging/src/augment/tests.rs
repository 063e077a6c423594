use super::*;

const S: usize = 96;

/// An asymmetric mask (an ellipse and a bar off the centre) and the image
/// that is 255 exactly where the mask is 1.
fn phantom() -> (Vec<u8>, Vec<u8>) {
    let mut m = vec![0u8; S * S];
    for y in 0..S {
        for x in 0..S {
            let (dx, dy) = (x as f32 - 40.0, y as f32 - 52.0);
            let ellipse = (dx / 22.0).powi(2) + (dy / 14.0).powi(2) <= 1.0;
            let bar = (60..72).contains(&x) && (18..40).contains(&y);
            m[y * S + x] = (ellipse || bar) as u8;
        }
    }
    let img = m.iter().map(|&v| v * 255).collect();
    (img, m)
}

fn dice(a: &[u8], b: &[u8]) -> f64 {
    let inter = a.iter().zip(b).filter(|(x, y)| **x == 1 && **y == 1).count() as f64;
    let total = (a.iter().filter(|v| **v == 1).count() + b.iter().filter(|v| **v == 1).count()) as f64;
    2.0 * inter / total
}

fn one(f: impl FnOnce(&mut Transform)) -> Transform {
    let mut t = Transform::IDENTITY;
    f(&mut t);
    t
}

/// Under every spatial transform, alone and combined, the bilinear image
/// thresholded at half its range lands on the nearest-neighbour mask.
#[test]
fn image_and_mask_stay_aligned_under_every_spatial_transform() {
    let (img, mask) = phantom();
    let mut r = Rng::new(3);
    let cases = [
        ("rotation 37°", one(|t| t.angle = 37f32.to_radians())),
        ("rotation -150°", one(|t| t.angle = (-150f32).to_radians())),
        ("scale 0.7", one(|t| t.scale = 0.7)),
        ("scale 1.4", one(|t| t.scale = 1.4)),
        ("shift", one(|t| (t.dx, t.dy) = (9.5, -6.25))),
        ("mirror", one(|t| t.mirror = true)),
        ("elastic", one(|t| t.elastic = Some(elastic_grid(&mut r, 4.0)))),
        (
            "all",
            draw(
                &Transforms {
                    rotation: Chance { p: 1.0, lo: 20.0, hi: 20.0 },
                    scale: Chance { p: 1.0, lo: 1.2, hi: 1.2 },
                    shift: Chance { p: 1.0, lo: -0.05, hi: 0.05 },
                    elastic: Chance { p: 1.0, lo: 3.0, hi: 3.0 },
                    mirror: 1.0,
                    ..Default::default()
                },
                &mut Rng::new(9),
                S,
            ),
        ),
    ];
    for (name, t) in cases {
        let (x, m) = spatial(&t, &img, &mask, S);
        let thresholded: Vec<u8> = x.iter().map(|&v| (v > 127.5) as u8).collect();
        let d = dice(&thresholded, &m);
        assert!(d >= 0.97, "{name}: image and mask disagree (Dice {d:.4})");
        assert!(m != mask, "{name}: the mask did not move");
        assert!(dice(&m, &mask) < 0.99, "{name}: the mask barely moved");
    }
}

#[test]
fn intensity_transforms_leave_the_mask_alone_and_keep_their_invariants() {
    let (img, mask) = phantom();
    let noisy: Vec<u8> = img.iter().enumerate().map(|(i, &v)| v / 2 + (i % 7) as u8 * 9).collect();
    let cfg = Transforms {
        noise: Chance { p: 1.0, lo: 0.05, hi: 0.05 },
        blur: Chance { p: 1.0, lo: 1.0, hi: 1.0 },
        brightness: Chance { p: 1.0, lo: 1.1, hi: 1.1 },
        contrast: Chance { p: 1.0, lo: 0.8, hi: 0.8 },
        low_res: Chance { p: 1.0, lo: 0.5, hi: 0.5 },
        gamma: Chance { p: 1.0, lo: 1.4, hi: 1.4 },
        ..Default::default()
    };
    let t = draw(&cfg, &mut Rng::new(1), S);
    assert_eq!(t.intensity.len(), 6, "every transform with p = 1 is drawn: {t:?}");
    let (x, m) = apply_f32(&t, &noisy, &mask, S);
    assert_eq!(m, mask, "intensity transforms move no mask pixel");
    assert!(x.iter().zip(&noisy).any(|(a, &b)| (a - b as f32).abs() > 1.0));
    let base: Vec<f32> = noisy.iter().map(|&v| v as f32).collect();
    // Gamma keeps mean and std; contrast keeps the range; brightness scales.
    let mut g = base.clone();
    intensity(&Intensity::Gamma(1.5), &mut g, S);
    let ((m0, s0), (m1, s1)) = (mean_std(&base), mean_std(&g));
    assert!((m0 - m1).abs() < 1e-2 && (s0 - s1).abs() < 1e-2, "gamma: mean {m0}→{m1}, std {s0}→{s1}");
    assert_ne!(g, base);
    let mut c = base.clone();
    intensity(&Intensity::Contrast(1.5), &mut c, S);
    let ((lo0, hi0), (lo1, hi1)) = (min_max(&base), min_max(&c));
    assert!(lo1 >= lo0 && hi1 <= hi0, "contrast stays in range");
    assert!(mean_std(&c).1 > s0, "contrast 1.5 widens the spread");
    // Noise of relative std 0.5 raises the variance by about a quarter.
    let mut n = base.clone();
    intensity(&Intensity::Noise { relative_std: 0.5, seed: 4 }, &mut n, S);
    let ratio = (mean_std(&n).1 / s0).powi(2);
    assert!((ratio - 1.25).abs() < 0.05, "noise variance ratio {ratio}");
    // Blur and low resolution keep a constant image constant and smooth an edge.
    for op in [Intensity::Blur(1.0), Intensity::LowRes(0.5)] {
        let mut k = vec![100f32; S * S];
        intensity(&op, &mut k, S);
        assert!(k.iter().all(|v| (v - 100.0).abs() < 1e-3), "{op:?} changes a constant image");
    }
    let mut b = base.clone();
    intensity(&Intensity::Blur(1.0), &mut b, S);
    assert!(mean_std(&b).1 < s0, "blur lowers the spread");
}

#[test]
fn draws_are_deterministic_for_a_seed_and_off_transforms_draw_nothing() {
    let cfg = Transforms::nnunet();
    let a: Vec<Transform> = (0..50).map(|i| draw(&cfg, &mut Rng::derive(7, i), S)).collect();
    let b: Vec<Transform> = (0..50).map(|i| draw(&cfg, &mut Rng::derive(7, i), S)).collect();
    let c: Vec<Transform> = (0..50).map(|i| draw(&cfg, &mut Rng::derive(8, i), S)).collect();
    assert_eq!(a, b);
    assert_ne!(a, c);
    let (img, mask) = phantom();
    let noisy = Transform { intensity: vec![Intensity::Noise { relative_std: 0.3, seed: 5 }], ..Transform::IDENTITY };
    assert_eq!(apply_u8(&noisy, &img, &mask, S), apply_u8(&noisy, &img, &mask, S));
    // Every transform fires in some of 50 draws at nnU-Net's probabilities.
    assert!(a.iter().any(|t| t.angle != 0.0) && a.iter().any(|t| t.scale != 1.0) && a.iter().any(|t| t.mirror));
    assert!(a.iter().any(|t| t.intensity.iter().any(|o| matches!(o, Intensity::Gamma(_)))));
    // No transform on: the identity, and the stream untouched.
    let mut r = Rng::new(1);
    assert_eq!(draw(&Transforms::default(), &mut r, S), Transform::IDENTITY);
    assert_eq!(r.next_u64(), Rng::new(1).next_u64());
    assert_eq!(apply_u8(&Transform::IDENTITY, &img, &mask, S), (img, mask));
}

#[test]
fn configs_parse_from_pipeline_values_and_bad_ones_are_refused() {
    use serde_json::json;
    assert_eq!(Transforms::from_param(&json!(null)).unwrap(), None);
    assert_eq!(Transforms::from_param(&json!("nnunet")).unwrap(), Some(Transforms::nnunet()));
    let t = Transforms::from_param(&json!({"scale": [0.5, 0.8, 1.2], "mirror": 0.5})).unwrap().unwrap();
    assert_eq!(t.scale, Chance { p: 0.5, lo: 0.8, hi: 1.2 });
    assert_eq!(t.gamma, Chance::OFF);
    for (bad, says) in [
        (json!({"zoom": [1, 1, 1]}), "zoom"),
        (json!({"scale": [1.5, 0.8, 1.2]}), "`scale`"),
        (json!({"gamma": [1, 1.5, 0.7]}), "`gamma`"),
        (json!({"scale": [1, 0, 1]}), "`scale`"),
        (json!({"blur": 0.3}), "[p, lo, hi]"),
        (json!("heavy"), "heavy"),
    ] {
        let err = format!("{:#}", Transforms::from_param(&bad).unwrap_err());
        assert!(err.contains(says), "{bad}: {err}");
    }
}

/// Re-exporting under another window is the CT window arithmetic: the
/// source's own window is the identity, the abdomen window (W 400, L 40)
/// puts HU 100 at 165.75; black reaching the border becomes air, black
/// enclosed by the body fat.
#[test]
fn rewindow_maps_as_a_ct_window_would() {
    let msd = Rewindow::ct_windows(1.0);
    assert_eq!(msd.map(255.0, 127.5), (1.0, 0.0));
    let (gain, offset) = msd.map(400.0, 40.0);
    assert!((100.0 * gain + offset - 165.75).abs() < 1e-4, "{gain} {offset}");
    // 5×5: a black frame (air), a 3×3 body at 100 with a black centre (fat).
    let mut x: Vec<f32> = (0..25).map(|i| if (1..4).contains(&(i / 5)) && (1..4).contains(&(i % 5)) && i != 12 { 100.0 } else { 0.0 }).collect();
    intensity(&msd.op(400.0, 40.0, -100.0), &mut x, 5);
    assert_eq!((x[0], x[6], x[12]), (0.0, 165.75, 38.25), "air below the window is black, body 165.75, fat (60 HU above the window's bottom) 38.25");
    let mut wide: Vec<f32> = vec![0.0; 25];
    intensity(&msd.op(2000.0, 0.0, -100.0), &mut wide, 5);
    assert_eq!(wide[0], 0.0);
    let mut lung = vec![0.0f32; 25];
    intensity(&msd.op(1500.0, -600.0, -100.0), &mut lung, 5);
    assert!((lung[0] - 59.5).abs() < 1e-3, "air in the lung window: {}", lung[0]);
    // Drawn from the preset: gains within the windows' range, repeatable, and
    // a config that leaves it out draws as before.
    let cfg = Transforms::from_param(&serde_json::json!("domain")).unwrap().unwrap();
    let draws: Vec<Transform> = (0..200).map(|i| draw(&cfg, &mut Rng::derive(3, i), S)).collect();
    let gains: Vec<f32> = draws.iter().flat_map(|t| &t.intensity).filter_map(|o| if let Intensity::Rewindow { gain, .. } = o { Some(*gain) } else { None }).collect();
    assert!((60..140).contains(&gains.len()), "p 0.5 of 200: {}", gains.len());
    assert!(gains.iter().all(|g| (255.0 / 4096.0 - 1e-6..=255.0 / 150.0 + 1e-6).contains(&(*g as f64))));
    assert!(gains.iter().any(|&g| g < 0.2) && gains.iter().any(|&g| g > 1.0), "narrow and wide windows both drawn");
    assert_eq!(draws, (0..200).map(|i| draw(&cfg, &mut Rng::derive(3, i), S)).collect::<Vec<_>>());
    let set = serde_json::json!({"mirror": 0.5, "rewindow": {"p": 1.0, "width": [300, 300], "level": [50, 50]}});
    assert!(Transforms::from_param(&set).unwrap().unwrap().rewindow.source == (0.0, 255.0));
    let bad = serde_json::json!({"rewindow": {"p": 1.0, "width": [0, 300], "level": [50, 50]}});
    assert!(format!("{:#}", Transforms::from_param(&bad).unwrap_err()).contains("rewindow"));
}
